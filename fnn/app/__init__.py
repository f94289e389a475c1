"""The application above the library: the ``fnn`` command line (:mod:`fnn.app.cli`), its YAML
configs (:mod:`fnn.app.config`), its run directories (:mod:`fnn.app.rundir`, and
:func:`load_run` to bring a run back into Python), settings of the host process
(:mod:`fnn.app.runtime`) and plots of a run's history (:mod:`fnn.app.plot`). The library
(``fnn`` and everything else under it) never imports this package.
"""

from fnn.app.plot import plot_history as plot_history
from fnn.app.runs import Run as Run
from fnn.app.runs import load_run as load_run
from fnn.app.runtime import tune_host_malloc as tune_host_malloc

__all__ = ["Run", "load_run", "plot_history", "tune_host_malloc"]
