import sys

from exmta.cli import main

sys.exit(main())
