"""Studies: configs x envs x seeds as one experiment, with statistics (docs/design.md section 4).

Layers: :mod:`~pgscope.study.spec` (what to run) -> :mod:`~pgscope.study.runner` (run it,
locally or on Ray) -> :mod:`~pgscope.study.analysis` (tidy data, final scores, tables) ->
:mod:`~pgscope.study.plots`. The statistics themselves are in :mod:`pgscope.seed_statistics`.
"""

from pgscope.study.presets import BUILTIN_STUDIES, builtin_study
from pgscope.study.runner import StudyOutcome, open_study, run_study
from pgscope.study.spec import StudySpec, load_spec, parse_spec

__all__ = ["BUILTIN_STUDIES", "StudyOutcome", "StudySpec", "builtin_study", "load_spec",
           "open_study", "parse_spec", "run_study"]
