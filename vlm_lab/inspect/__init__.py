"""Looking inside lab models: ``trace`` (shapes, attention), parameter and FLOP counts."""

from .trace import Trace, TraceRecord, count_flops, count_parameters, trace

__all__ = ["Trace", "TraceRecord", "count_flops", "count_parameters", "trace"]

from .taxonomy import TaxonomySplit, pair_forward, register_taxonomy_rules, taxonomy_split  # noqa: E402

__all__ += ["TaxonomySplit", "pair_forward", "register_taxonomy_rules", "taxonomy_split"]

from .budget import Budget, budget, measure_step_memory  # noqa: E402

__all__ += ["Budget", "budget", "measure_step_memory"]
