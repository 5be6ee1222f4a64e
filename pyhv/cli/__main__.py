import sys

from pyhv.cli.commands import main

sys.exit(main())
