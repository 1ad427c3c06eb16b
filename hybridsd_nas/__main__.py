import sys

from hybridsd_nas.cli import main

sys.exit(main())
