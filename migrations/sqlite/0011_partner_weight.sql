-- Fair sharing: a partner's share of a type's workers when several partners
-- have work waiting (1 = an equal share; 3 = three times as much).
ALTER TABLE partners ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
