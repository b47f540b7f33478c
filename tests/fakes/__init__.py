"""Honest test doubles that speak real protocols on loopback: a scripted OpenAI-compatible
server (chat, speech, transcription) and a fake of Google Translate's TTS endpoint for gTTS."""
