import sys

from hfnemo.cli import main

sys.exit(main())
