"""What runs the wire but is not the wire: the MQTT client host every process drives its
connections with, and the Mosquitto configuration (logins, ACLs, limits) an operator deploys."""
