"""Download the FaceScrub photos listed in the official metadata files and save the face crops (needs internet);
the same as ``uedist facescrub download``, see :mod:`uedist.app.facescrub`.

    python launch/facescrub_download.py --meta facescrub_actors.txt facescrub_actresses.txt --out data/facescrub_crops
"""

import sys

from uedist.app.facescrub import main

if __name__ == "__main__":
    sys.exit(main())
