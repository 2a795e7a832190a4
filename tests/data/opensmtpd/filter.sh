#!/bin/sh
# Logs what smtpd says, registers for every smtp-in filter phase, proceeds.
log=/tmp/osmtpd/proto.log
while IFS= read -r line; do
  printf '%s\n' "$line" >> $log
  case "$line" in
    config\|ready)
      for p in connect helo ehlo mail-from rcpt-to data data-line commit; do echo "register|filter|smtp-in|$p"; done
      echo "register|report|smtp-in|*"
      echo "register|ready" ;;
    filter\|*)
      IFS='|' read -r _ ver ts sub phase sess tok rest <<X
$line
X
      if [ "$phase" = "data-line" ]; then
        echo "filter-dataline|$sess|$tok|$rest"
      elif [ "$phase" = "rcpt-to" ] && [ "${rest#nobody}" != "$rest" ]; then
        echo "filter-result|$sess|$tok|reject|451 4.7.1 Greylisted, please try again later retry=00:05:00"
      else
        echo "filter-result|$sess|$tok|proceed"
      fi ;;
  esac
done
