"""``python -m bench``: the transfer benchmark (bench/run.py); ``python -m bench replicate ...``:
the replication scenario (bench/replication.py)."""
import sys

if sys.argv[1:2] == ["replicate"]:
    from bench.replication import main

    sys.exit(main(sys.argv[2:]))

from bench.run import main

sys.exit(main())
