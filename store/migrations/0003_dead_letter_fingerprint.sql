-- A job can be delivered again after its dead letters were written (a crash or a lost
-- connection before the delete): the fingerprint keeps each body set aside once.
ALTER TABLE dead_letters ADD COLUMN fingerprint bytea;
UPDATE dead_letters SET fingerprint = sha256(body);
ALTER TABLE dead_letters ALTER COLUMN fingerprint SET NOT NULL;
CREATE UNIQUE INDEX dead_letters_fingerprint ON dead_letters (fingerprint);
