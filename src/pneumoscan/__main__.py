import sys

from pneumoscan.cli import main

sys.exit(main())
