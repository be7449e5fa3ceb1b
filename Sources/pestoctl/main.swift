print("pestoctl: not yet")
