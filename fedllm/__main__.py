from fedllm.cli import main

raise SystemExit(main())
