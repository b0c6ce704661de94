"""The Flower App that carries fedllm's Channel bytes between real parties: server_app.py
(the Federation behind Flower's Grid) and client_app.py (the relay to a party's worker).
Needs the optional extra: pip install 'fedllm[flower]'."""
