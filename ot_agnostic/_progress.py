"""Progress reports for long computations: a user callback and/or a tqdm bar."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_reporter(progress=None, verbose=False, description="ot_agnostic"):
    """Yield ``report(done, total)`` (or ``None`` when nobody listens).

    ``report`` calls ``progress(done, total)`` if given and, with ``verbose=True``, moves a
    tqdm bar on stderr (closed on exit). tqdm is imported only then; without it, an
    ``ImportError`` says how to install it.
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a function progress(done, total), not {type(progress).__name__}.")
    bar = None
    if verbose:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError(
                "verbose=True shows a progress bar with tqdm, which is not installed: "
                "`pip install tqdm` (or pass progress=callback instead)."
            ) from err
        bar = tqdm(desc=description, unit="step", leave=False)
    if progress is None and bar is None:
        yield None
        return

    def report(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()
        if progress is not None:
            progress(done, total)

    try:
        yield report
    finally:
        if bar is not None:
            bar.close()
