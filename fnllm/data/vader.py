"""The VADER study's human-rated movie-review sentences (Hutto and Gilbert, ICWSM 2014; MIT).

10,605 sentences, each with the mean rating (-4 .. +4) of about 20 people. They ship inside the
``vaderSentiment==3.3.2`` source distribution, which the project's set-up (``.ci/setup``)
fetches once, checks by hash and keeps at ``<sys.prefix>/share/fnllm/``; :func:`load_vader`
reads ``movieReviewSnippets_GroundTruth.txt`` from the nested tarball in memory.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import torch
from torch import Tensor

from fnllm import _checks

__all__ = ["SDIST", "load_vader", "vader_path"]

SDIST = "vaderSentiment-3.3.2.tar.gz"
_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_SETUP = (
    ".ci/setup, or: pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR "
    "(sha256 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9) and set "
    "FNLLM_DATA_DIR=DIR"
)


def vader_path(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the vaderSentiment sdist is looked for (it need not exist).

    Example:
        >>> from fnllm.data import vader_path
        >>> vader_path("/data").as_posix()
        '/data/vaderSentiment-3.3.2.tar.gz'

    Args:
        data_dir: a folder holding the sdist; default ``$FNLLM_DATA_DIR``, else
            ``<sys.prefix>/share/fnllm``.

    Returns:
        The sdist's path.
    """
    if data_dir is None:
        data_dir = os.environ.get("FNLLM_DATA_DIR") or Path(sys.prefix) / "share" / "fnllm"
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir: expected a folder path, got {data_dir!r:.40}")
    return Path(data_dir) / SDIST


def load_vader(
    data_dir: str | os.PathLike | None = None, *, neutral: float = 0.5
) -> tuple[list[str], Tensor, Tensor]:
    """The movie-review sentences labelled by the sign of their mean human rating.

    Sentences with ``|rating| < neutral`` are left out (near-neutral); about 10,000 remain,
    close to balanced. A kept sentence is positive (1) when its rating is > 0 and negative (0)
    when it is < 0; a rating of exactly 0.0 has no sign, so it is always left out, also with
    ``neutral=0.0`` (which keeps every other sentence).

    Example:
        >>> from fnllm.data import load_vader
        >>> texts, labels, ratings = load_vader()                        # doctest: +SKIP
        >>> len(texts), int(labels.sum()), float(ratings.min()) <= -0.5  # doctest: +SKIP
        (10072, 4996, True)

    Args:
        data_dir: a folder holding ``vaderSentiment-3.3.2.tar.gz`` (see :func:`vader_path`).
        neutral: leave out sentences rated within ``(-neutral, neutral)`` (and those rated
            exactly 0.0); a finite number >= 0.

    Returns:
        ``(texts, labels, ratings)``: labels 1 positive, 0 negative; the float mean ratings.

    Raises:
        FileNotFoundError: the sdist is missing (the message names the path and the set-up).
        ValueError: the archive does not hold the expected file, or a line of it is malformed
            (the message names the line); ``neutral`` is negative or not finite.
        TypeError: ``neutral`` is not a number.
    """
    neutral = _checks.check_number("load_vader: neutral", neutral, nonnegative=True)
    path = vader_path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"load_vader: {path} not found; fetch it with {_SETUP}")
    try:
        with tarfile.open(path) as outer:
            inner = outer.extractfile(_INNER)
            assert inner is not None
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
                member = tar.extractfile(_MEMBER)
                assert member is not None
                raw = member.read().decode("utf-8")
    except (KeyError, AssertionError, tarfile.TarError) as err:
        raise ValueError(f"load_vader: {path} does not hold {_INNER} -> {_MEMBER}: {err}") from None
    except (EOFError, OSError, UnicodeDecodeError) as err:  # truncated gzip, bad bytes
        raise ValueError(
            f"load_vader: {path} is damaged (truncated download?): {err}; delete it and fetch "
            f"it again with {_SETUP}"
        ) from None
    texts, ratings = [], []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            raise ValueError(
                f"load_vader: {path} -> {_MEMBER}:{lineno}: rating {parts[1]!r} is not a number"
            ) from None
        if rating != 0.0 and abs(rating) >= neutral:
            texts.append("\t".join(parts[2:]).strip())
            ratings.append(rating)
    r = torch.tensor(ratings, dtype=torch.float32)
    return texts, (r > 0).long(), r
