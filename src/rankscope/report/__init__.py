"""The study report: tables and figures a researcher would put in a paper.

`build_report(study_dir)` reads a study folder (docs/internals.md, "Study layout") and writes
STUDY_DIR/report/{report.md, report.html, figures/*.png, tables/*.csv}.

- :mod:`.collect`  study folder -> pandas tables (runs, analysis tables, downstream, training logs)
- :mod:`.stats`    mean ± std over seeds, Welch t-test and bootstrap CI against full-rank
- :mod:`.informativeness`  whether the regime can tell methods apart at all: the frozen-blocks
                   control's val loss against the best method's, stated before any ranking
- :mod:`.figures`  matplotlib figures with one fixed colour per method
- :mod:`.build`    the report itself (Markdown and self-contained HTML)
"""

from __future__ import annotations

from rankscope.report.build import build_report
from rankscope.report.collect import ReportError, Study, load_study

__all__ = ["ReportError", "Study", "build_report", "load_study"]
