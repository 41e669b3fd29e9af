import sys

from klinebus.cli import main

sys.exit(main())
