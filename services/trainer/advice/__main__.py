import sys

from services.trainer.advice.cli import main

sys.exit(main())
