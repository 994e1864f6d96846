"""``python -m benchmarks.hft [--preset cpu|gpu|tiny] [--combine] [--report] [--estimate] ...``: see `config`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .config import parse_args

    cfg = parse_args(argv)
    if cfg.estimate:
        from .estimate import print_estimate

        print_estimate(cfg)
        return 0
    if cfg.combine or cfg.report:
        if cfg.combine:
            from .combine import combine

            combine(cfg.out, n_resamples=cfg.n_resamples)
        if cfg.report:
            from .report import write_report

            write_report(cfg.out)
        return 0
    from .runner import run_grid

    run_grid(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
