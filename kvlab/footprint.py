"""``python -m kvlab.footprint model=NAME [...]``: the KV-cache footprint report (see kvlab.recipes.footprint)."""

from kvlab.recipes.footprint import main

if __name__ == "__main__":
    main()
