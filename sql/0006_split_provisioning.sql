-- 0006: split-offs provisioned on first need.

-- A split's new entity with provision "on_demand" is invisible to push peers until something
-- needs it there (a group that names it is delivered, a domain reads something that refers to
-- it): ordinary syncs do not create it; a 'provision' delivery does.
ALTER TABLE entities ADD COLUMN provision_on_demand boolean NOT NULL DEFAULT false;
