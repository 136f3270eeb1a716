from hfnemo import dist
from hfnemo.cli import main

dist.EXIT_FAST = True  # ended by dist.exit(): a rank need not wait for torch's DCP import (dist.join)
dist.exit(main())
