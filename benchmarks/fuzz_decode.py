"""A long fuzz run of read_gray: any bytes must decode to 2-D uint8 or raise UnreadableImage.

Runs the properties of tests/test_fuzz_decode.py with many more examples, then prints, per
property, how many examples were tried and either "ok" or the failing input and exception.

    PYTHONPATH=src python benchmarks/fuzz_decode.py --examples 20000

Exits 1 if any property failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st


def load_properties() -> ModuleType:
    """The properties and strategies live in the test module, so both always agree."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    return importlib.import_module("test_fuzz_decode")


def run_property(
    strategy: st.SearchStrategy[bytes], check: Callable[[bytes], None], examples: int, seed: int
) -> tuple[int, str | None]:
    """Try ``examples`` inputs; return how many ran and a description of the failure, if any."""
    tried = 0
    failure: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def prop(data: bytes) -> None:
        nonlocal tried
        tried += 1
        try:
            check(data)
        except Exception:
            failure[:] = [f"input ({len(data)} bytes): {data[:200]!r}\n{traceback.format_exc()}"]
            raise

    try:
        with warnings.catch_warnings():
            # Malformed DICOM makes pydicom warn about every odd element.
            warnings.simplefilter("ignore")
            hypothesis_seed(seed)(prop)()
    except Exception:
        return tried, failure[0] if failure else traceback.format_exc()
    return tried, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="examples per property")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = parser.parse_args(argv)
    properties = load_properties()
    failed = 0
    for label, (strategy, check) in properties.PROPERTIES.items():
        started = time.perf_counter()
        tried, failure = run_property(strategy, check, args.examples, args.seed)
        seconds = time.perf_counter() - started
        print(f"{label}: {tried} examples in {seconds:.1f}s: {'FAILED' if failure else 'ok'}")
        if failure:
            failed += 1
            print(failure)
    print(f"{failed} of {len(properties.PROPERTIES)} properties failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
