"""Call control over Twilio: REST when credentials are configured, else the stream itself.

Hanging up ends the call through the REST API (an already-ended call is fine) and closes the
stream; without credentials, closing the WebSocket ends the `<Connect>`, and Twilio's request
to its action (`webhooks.stream_ended`) gets a hang-up for a stream that ran. A transfer
redirects the live call to TwiML with `<Dial>`; that needs the REST API.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from telephony.rest import TwilioRest, TwilioRestError, TwilioUnreachable
from webhooks.outbound import transfer_twiml

log = logging.getLogger(__name__)


class TwilioCallControl:
    """`CallControl` for one Twilio call."""

    def __init__(
        self,
        call_sid: str,
        end_stream: Callable[[str], Awaitable[None]],
        rest: TwilioRest | None = None,
    ) -> None:
        self.call_sid = call_sid
        self._end_stream = end_stream
        self._rest = rest

    async def hang_up(self, reason: str) -> None:
        if self._rest is not None and not self.call_sid.startswith("WB"):  # web: no Twilio
            try:
                await self._rest.hang_up(self.call_sid)
            except (TwilioRestError, TwilioUnreachable) as exc:
                log.error("hang-up through REST failed call_sid=%s: %s", self.call_sid, exc)
        await self._end_stream(reason)

    async def transfer(self, number: str) -> bool:
        if self._rest is None:
            log.warning("transfer needs TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN call_sid=%s",
                        self.call_sid)
            return False
        try:
            await self._rest.redirect(self.call_sid, transfer_twiml(number))
        except (TwilioRestError, TwilioUnreachable) as exc:
            log.error("transfer failed call_sid=%s: %s", self.call_sid, exc)
            return False
        await self._end_stream("transfer")
        return True
