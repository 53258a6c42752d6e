import sys

from sockwatch.cli import main

sys.exit(main())
