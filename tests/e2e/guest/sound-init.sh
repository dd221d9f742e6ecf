#!/bin/sh
# Guest init for the virtio-sound end-to-end test (tests/e2e_upstream.rs): a virtio-snd
# device whose queues an upstream vhost-user daemon (vhost-device-sound, null backend)
# runs. The driver reads the jacks/streams/chmaps counts from the config space and asks
# the device for each stream's info over the control queue before it registers a card;
# the card must have a playback and a capture PCM.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

card() { grep -q . /proc/asound/cards 2>/dev/null && ! grep -q 'no soundcards' /proc/asound/cards; }
if e2e_wait_for 20 card; then e2e_pass snd-card; else
    e2e_fail snd-card "no sound card: $(cat /proc/asound/cards 2>&1)"
    ls /sys/bus/virtio/devices/; dmesg | tail -n 30; e2e_finish
fi
e2e_log "cards: $(tr '\n' ' ' </proc/asound/cards)"
e2e_log "pcms: $(tr '\n' ' ' </proc/asound/pcm 2>/dev/null)"
if grep -q 'playback' /proc/asound/pcm; then e2e_pass snd-playback; else
    e2e_fail snd-playback "no playback PCM"
fi
if grep -q 'capture' /proc/asound/pcm; then e2e_pass snd-capture; else
    e2e_fail snd-capture "no capture PCM"
fi
e2e_finish
