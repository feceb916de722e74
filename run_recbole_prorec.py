"""Train and evaluate PRORec or any RecBole sequential model: see ``--help``.

    python run_recbole_prorec.py --dataset=Amazon_Beauty --model=PRORec
    python run_recbole_prorec.py --dataset=Amazon_Beauty --model=SASRec-CE,GRU4Rec --epochs=50
"""
from recbole_prorec.cli import main

if __name__ == "__main__":
    main()
