import sys

from transaction_service.cli.main import main

sys.exit(main())
