from elmtrain.cli import main

raise SystemExit(main())
