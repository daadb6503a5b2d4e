import sys

from transaction_service.cli.entry import main

sys.exit(main())
