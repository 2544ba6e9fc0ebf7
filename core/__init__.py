"""The ground every package stands on: settings and the error hierarchy. It imports no other onetower package."""
