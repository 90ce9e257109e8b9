-- Deliveries that may be second ones (issue 16 item 4). Write-backs are fenced by the lease's
-- `lease_epoch` (0001): the worker passes the epoch it leased under with every write-back (an
-- attempt's outcome, a capture, a lease extension), which changes zero rows unless the row still
-- has it.
--
-- `lease_interrupted`: the lease that ended last ended without a recorded outcome (it expired
-- with its holder still owning it, or its node took it back at start). The holder may have sent
-- the message (killed after the smarthost's final 250 but before recording it), so the next
-- attempt's history rows are marked `possible_duplicate`; recording an outcome clears it. Set by
-- the lease's own UPDATE, so a delivery costs no extra write.
ALTER TABLE messages ADD COLUMN lease_interrupted BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE delivery_attempts ADD COLUMN possible_duplicate BOOLEAN NOT NULL DEFAULT false;
