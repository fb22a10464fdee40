"""Build the ready model (models/minerals7): train `orestudy train`'s recipe at seed 231 in fp32, keep its
calibration photos and novelty bank, and write best.pt, preprocessing.json, card.json and README.md (the
card; also docs/models/minerals7.md when --out is the ready folder). One command, so that it is rebuilt
when the study decides on a better recipe (orestudy/run/ready.py holds the code):

    .venv/bin/python models/build.py                               # about an hour on a 2-core CPU
    .venv/bin/python models/build.py --run runs/ready/minerals7_s231   # from a run already trained
    .venv/bin/python models/build.py --card-only                   # the card again from the records committed now
    .venv/bin/python models/build.py --set freeze_epochs=20 --note "Interim recipe: ..."   # a departure, said on the card
"""
from orestudy.run.ready import main

if __name__ == "__main__":
    main()
