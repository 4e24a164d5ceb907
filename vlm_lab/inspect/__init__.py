"""Looking inside lab models: ``trace`` (shapes, attention), parameter and FLOP counts."""

from .trace import Trace, TraceRecord, count_flops, count_parameters, trace

__all__ = ["Trace", "TraceRecord", "count_flops", "count_parameters", "trace"]
