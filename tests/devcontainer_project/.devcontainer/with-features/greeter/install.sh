#!/bin/sh
set -eu
echo "$GREETING" > /usr/local/share/greeting
