import os

os.environ.setdefault("FLASHLOSS_POISON", "0")  # measure the production path
