import sys

from transaction_service.cli import main

sys.exit(main())
