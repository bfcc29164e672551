import sys

from medvol.cli import main

sys.exit(main())
