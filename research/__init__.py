"""The research apparatus behind docs/results.md: the benchmark grid (``python -m research.grid``), its reports
(``research.report``, ``research.budget``), the results page (``research.results_page``) and the committed
cells in ``research/results/``. Not part of the package: the wheel ships ``svd_lightning`` alone."""
