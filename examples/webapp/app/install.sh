#!/bin/sh
# Install the service as a systemd unit, the way a real deployment would.
set -eu
cat > /etc/systemd/system/webapp.service <<UNIT
[Unit]
Description=example web service
[Service]
Environment=PORT=8080
ExecStart=/usr/bin/python3 /opt/app/server.py
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now webapp.service
