import sys

from elmforest.cli import main

sys.exit(main())
