"""The application above the library: the ``fnn`` command line (:mod:`fnn.app.cli`), its YAML
configs (:mod:`fnn.app.config`), settings of the host process (:mod:`fnn.app.runtime`) and plots
of a run's history (:mod:`fnn.app.plot`). The library (``fnn`` and everything else under it)
never imports this package.
"""

from fnn.app.plot import plot_history as plot_history
from fnn.app.runtime import tune_host_malloc as tune_host_malloc

__all__ = ["plot_history", "tune_host_malloc"]
