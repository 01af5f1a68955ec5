"""`python -m meft_fx.bench ...` (see `meft_fx.bench.run`)."""
from .run import main

if __name__ == "__main__":
    main()
