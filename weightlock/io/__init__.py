"""Bytes and files: what every format reads and writes, knowing no model and no lock.

- :mod:`.untrusted`: the one strict boundary for every file read (regular files only, bounded sizes, JSON depth);
- :mod:`.schema`: the shipped JSON schemas;
- :mod:`.safetensors_file`: one ``.safetensors`` file (strict header, row-block readers, streaming writer);
- :mod:`.staging`: staging folders, publish by rename, recovery of interrupted runs, fsync, failpoints;
- :mod:`.outputs`: where an output may go (never over an input, never over what the user did not name);
- :mod:`.commit`: the commit point of every writer and what Ctrl-C means before and after it;
- :mod:`.scratch`: a scratch folder beside a path; :mod:`.text`: text made safe to print.
"""
