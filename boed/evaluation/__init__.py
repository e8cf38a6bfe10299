"""The evaluation protocol (paper sec. 5, fig. 5, 8, 9), one module per job, in dependency order:

- :mod:`.methods`: the one method table (name, spellings, label, models needed, policy builder);
- :mod:`.config`: :class:`EvalConfig`, its fingerprint, the test subset and every seed;
- :mod:`.records`: the records files (JSON lines per writer, provenance header, resume, merge);
- :mod:`.loop`: :func:`evaluate`, the scan loop over methods, tasks, repeats and test images;
- :mod:`.metrics` and :mod:`.report`: AUROC/NLL with two-level bootstrap intervals, CSVs and plots;
- :mod:`.run`: `boed evaluate` from its parsed flags (load models, build policies, run, report).
"""

from .config import EvalConfig
from .loop import evaluate
from .methods import METHODS, BuildContext, build_policies, parse_methods
from .records import load_records

__all__ = ["METHODS", "BuildContext", "EvalConfig", "build_policies", "evaluate", "load_records", "parse_methods"]
