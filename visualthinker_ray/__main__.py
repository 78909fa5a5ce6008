import sys

from visualthinker_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
