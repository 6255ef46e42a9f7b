import sys

from llama3.cli import main

sys.exit(main())
