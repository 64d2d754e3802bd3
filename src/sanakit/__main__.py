import sys

from sanakit.cli import main

sys.exit(main())
