"""Extract a DoF feature set: python extract.py [experiment=NAME] [extract.views=K] [verify=true]"""
# The same main as the installed command headstart-extract (headstart.cli.extract): configs from conf/, outputs under the
# current folder.

from headstart.cli import extract

if __name__ == "__main__":
    extract()
