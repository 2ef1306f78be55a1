"""What travels: the envelope of requests, replies and events (:mod:`.envelope`), the
broker objects they travel through (:mod:`.topology`) and the ids they carry (:mod:`.ids`).
Nothing here opens a connection."""
